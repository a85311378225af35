"""Report sections on synthetic results folders: paired-bootstrap intervals, qualitative grids, paper vs
ours (Tables 1–4), the efficiency table, and compile-safe LaTeX."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.data.datasets import load_image_set
from bench.data.images import read_image, write_png
from bench.data.manifest import MaskProtocol, build_manifest
from bench.data.masks import in_bin
from reports import efficiency_table, intervals, paper_compare, qualitative, tables
from reports.results import find_cells

SIZE = 32
BINS = ("(0.1,0.2]", "(0.3,0.4]", "(0.5,0.6]")
PAPER_CSV = Path(paper_compare.__file__).parent / "paper_data" / "tables_1_to_4.csv"


# ------------------------------------------------------------------------------------------ fixtures
def write_dataset(root: Path, count: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    for index in range(count):
        write_png(root / "test" / f"img_{index}.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return root


def write_cell(folder: Path, record: dict, per_image: pd.DataFrame, summary: pd.DataFrame | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per_image.to_csv(folder / "per_image.csv", index=False)
    if summary is None:  # per-image means per bin, like bench.metrics.aggregate.summarize
        rows = []
        for label in ("(0.2,0.4]", "(0.4,0.6]", "All", "(0.5,0.6]"):
            chosen = per_image[[in_bin(r, label) for r in per_image["ratio"]]]
            for metric in ("psnr", "ssim", "mae"):
                rows.append({"bin": label, "metric": metric, "value": chosen[metric].mean(), "n": len(chosen)})
        summary = pd.DataFrame(rows)
    summary.to_csv(folder / "summary.csv", index=False)
    (folder / "cell.json").write_text(json.dumps(record))


def md_lines(lines: list[str]) -> list[str]:
    """Sections return Markdown blocks (a table is one element); split them into single lines."""
    return "\n".join(lines).splitlines()


def base_record(method: str, paper_name, dataset: str, digest: str, **extra) -> dict:
    return {"method": method, "paper_name": paper_name, "dataset": dataset, "dataset_entry": dataset, "seed": 0,
            "manifest_digest": digest, "protocol": "test", "substitutions": {}, "train": None,
            "metric_networks": {"inception_v3_fid": "unavailable: offline"}, **extra}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder of a folder dataset: a frozen manifest and three methods' per-image scores.
    ``better`` = SAHN + 0.8 dB PSNR exactly on average (zero-mean noise), ``same`` = SAHN + zero-mean noise."""
    root = tmp_path_factory.mktemp("sections")
    data = write_dataset(root / "data")
    test_set = load_image_set("folder", "test", root=data, image_size=SIZE)
    out = root / "results"
    manifest = build_manifest(test_set, MaskProtocol(bins=BINS, masks_per_bin=3, seed=0), out / "toy" / "manifest")
    pairs = manifest.pairs
    rng = np.random.default_rng(1)
    reference = rng.normal(25.0, 2.0, len(pairs))
    noise = rng.normal(0.0, 0.3, len(pairs))
    noise -= noise.mean()
    psnr = {"sahn_fake": reference, "better": reference + 0.8 + noise, "same": reference + noise}
    for method, paper_name in (("sahn_fake", "SAHN"), ("better", "LaMa-Fourier"), ("same", None)):
        folder = out / "toy" / method
        rows = []
        for pair, value in zip(pairs, psnr[method]):
            original = read_image(manifest.image_path(pair), size=SIZE, crop=manifest.crop)
            hole = manifest.read_mask(pair).astype(bool)
            composite = original.copy()
            composite[hole] = {"sahn_fake": 0, "better": 128, "same": 255}[method]
            write_png(folder / "images" / f"{pair.pair_id}.png", composite)
            rows.append({"pair_id": pair.pair_id, "image": str(manifest.image_path(pair)), "mask": "",
                         "output": str(folder / "images" / f"{pair.pair_id}.png"), "ratio": pair.ratio,
                         "bin": pair.bin, "psnr": value, "ssim": 0.5, "mae": 0.1 + (0.01 if method == "better" else 0)})
        write_cell(folder, base_record(method, paper_name, "toy", manifest.digest(), dataset_entry=f"folder:{data}"),
                   pd.DataFrame(rows))
    return out, manifest


# ------------------------------------------------------------------------------------------ LaTeX safety
def assert_compile_safe(tex: str) -> None:
    """ASCII only, no unescaped special character inside a cell, balanced braces and math."""
    assert tex.isascii()
    assert tex.count("{") == tex.count("}")
    for line in tex.splitlines():
        for cell in line.split(" & "):
            for char in "&%#_":
                assert not re.search(rf"(?<!\\){re.escape(char)}", cell), (char, line)
            assert len(re.findall(r"(?<!\\)\$", cell)) % 2 == 0, line


def test_latex_text_escapes_everything_a_label_or_note_may_hold():
    nasty = "sahn_tiny & 50% #1 ~x^2 {a} \\ Δ=−0.5† (×10⁻¹) ↓ 256² ‘quoted’ … café"
    text = tables.latex_text(nasty)
    assert_compile_safe(text)
    assert r"sahn\_tiny \& 50\% \#1" in text and r"$\Delta$" in text and "cafe" in text


def test_latex_grid_is_booktabs_with_escaped_cells_and_bold():
    tex = tables.latex_grid(["Method", "PSNR ↑"], [["sahn_tiny", "**30.00**"], ["a&b", "1%"]], "Cap_tion",
                                   "tab:x_y", notes=["note #1"])
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{30.00}" in tex
    assert r"\label{tab:x-y}" in tex  # a label key holds no escaped characters
    assert_compile_safe(tex)


# ------------------------------------------------------------------------------------------ intervals
def test_bootstrap_intervals_are_seeded_and_reproducible(results):
    out, _ = results
    cells = find_cells(out)
    first = intervals.interval_frame(cells, seed=3, num_samples=500)
    again = intervals.interval_frame(cells, seed=3, num_samples=500)
    other = intervals.interval_frame(cells, seed=4, num_samples=500)
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["low"], other["low"])  # the seed does drive the resampling


def test_interval_covers_the_known_difference_and_marks_it(results):
    out, manifest = results
    frame = intervals.interval_frame(find_cells(out), seed=0)
    psnr_all = frame[(frame["metric"] == "psnr") & (frame["bin"] == "All")].set_index("method")
    assert psnr_all.loc["better", "n"] == len(manifest.pairs)
    assert psnr_all.loc["better", "difference"] == pytest.approx(0.8)
    assert psnr_all.loc["better", "low"] < 0.8 < psnr_all.loc["better", "high"]
    assert psnr_all.loc["better", "excludes_zero"] and psnr_all.loc["better", "method_better"]
    assert psnr_all.loc["same", "low"] < 0 < psnr_all.loc["same", "high"]
    assert not psnr_all.loc["same", "excludes_zero"]
    mae_all = frame[(frame["metric"] == "mae") & (frame["bin"] == "All")].set_index("method")
    assert mae_all.loc["better", "excludes_zero"] and not mae_all.loc["better", "method_better"]  # higher MAE is worse


def test_interval_section_marks_real_differences_and_writes_latex(results):
    out, _ = results
    lines = md_lines(intervals.section(find_cells(out), out, num_samples=300))
    text = "\n".join(lines)
    psnr_row = next(line for line in lines if line.startswith("| PSNR (dB) ↑ | All"))
    better_cell, same_cell = psnr_row.split(" | ")[3:5]
    assert better_cell.endswith("†") and not same_cell.strip(" |").endswith("†")
    assert "better (LaMa-Fourier)" in text
    tex = (out / "report" / "tables" / "intervals_toy.tex").read_text()
    assert_compile_safe(tex)
    saved = pd.read_csv(out / "report" / "intervals.csv")
    assert set(saved["bin"]) >= {"All", "(0.5,0.6]"}


# ------------------------------------------------------------------------------------------ qualitative
def test_pairs_are_chosen_by_ratio_closest_to_the_bin_middle_then_id():
    ratios = pd.Series({"d": 0.375, "b": 0.125, "a": 0.375, "c": 0.25, "x": 0.75})
    assert qualitative.choose_pairs(ratios, "(0.0,0.5]", 3) == ["c", "a", "b"]
    assert qualitative.choose_pairs(ratios, "(0.8,0.9]", 2) == []


def test_qualitative_grids_show_the_rule_chosen_pairs_in_png_and_pdf(results):
    out, manifest = results
    lines = qualitative.section(find_cells(out), out, per_dataset=2)
    for number in (6, 7, 8):
        for suffix in (".png", ".pdf"):
            assert (out / "report" / "figures" / f"qualitative_fig{number}{suffix}").stat().st_size > 1000
    assert any("qualitative_fig7.png" in line for line in lines)
    in_bin_pairs = [p for p in manifest.pairs if in_bin(p.ratio, "(0.2,0.4]")]
    expected = sorted(in_bin_pairs, key=lambda p: (abs(p.ratio - 0.3), p.pair_id))[:2]
    titles, rows, _ = qualitative._figure_rows(find_cells(out), "(0.2,0.4]", 2)
    assert [row_label.split("\n")[1] for row_label, _ in rows] == [p.pair_id for p in expected]
    assert titles == ["original", "masked", "better (LaMa-Fourier)", "same", "sahn_fake (SAHN)"]  # ours last
    panels = rows[0][1]
    hole = manifest.read_mask(expected[0]).astype(bool)
    assert (panels[1][hole] == 255).all()  # the masked input shows holes white
    assert (panels[2][hole] == 128).all() and (panels[4][hole] == 0).all()  # each method's own composite


def results_saving(out: Path, copy: Path, kept) -> Path:
    """A copy of the results whose cells saved only the composites of the pairs ``kept(pair_id)`` says."""
    import shutil

    shutil.copytree(out / "toy", copy / "toy", ignore=shutil.ignore_patterns("report"))
    for per_image_path in (copy / "toy").glob("*/per_image.csv"):
        rows = pd.read_csv(per_image_path, keep_default_na=False)
        rows["output"] = [output if kept(pair_id) else "" for pair_id, output in zip(rows["pair_id"], rows["output"])]
        rows.to_csv(per_image_path, index=False)
    return copy


def test_qualitative_grids_pick_among_the_saved_sample_and_say_when_nothing_was_saved(results, tmp_path):
    out, manifest = results
    in_bin_pairs = sorted((p for p in manifest.pairs if in_bin(p.ratio, "(0.2,0.4]")),
                          key=lambda p: (abs(p.ratio - 0.3), p.pair_id))
    sampled = {p.pair_id for p in in_bin_pairs[1:]}  # the rule's first choice was not kept
    sample = results_saving(out, tmp_path / "sample", lambda pair_id: pair_id in sampled)
    _, rows, _ = qualitative._figure_rows(find_cells(sample), "(0.2,0.4]", 1)
    assert [row_label.split("\n")[1] for row_label, _ in rows] == [in_bin_pairs[1].pair_id]
    assert not any(isinstance(panel, str) for panel in rows[0][1])  # every method's composite is shown

    nothing = results_saving(out, tmp_path / "none", lambda pair_id: False)
    lines = qualitative.section(find_cells(nothing), nothing)
    assert any("no pair has a saved composite" in line for line in lines)
    assert not list((nothing / "report" / "figures").glob("qualitative_fig*.png"))


def test_qualitative_section_explains_when_results_come_without_files():
    class Tracked:  # a cell read from MLflow: no folder, no per-image CSV
        record = {"method": "m", "dataset": "d"}
        method, dataset = "m", "d"

    lines = qualitative.section([Tracked()], Path("/nonexistent"))
    assert any("per-image results" in line for line in lines)


# ------------------------------------------------------------------------------------------ paper vs ours
def paper_value(table: int, metric: str, label: str, method: str) -> float:
    paper = pd.read_csv(PAPER_CSV)
    row = paper[(paper["table"] == table) & (paper["metric"] == metric) & (paper["bin"] == label)
                & (paper["method"] == method)]
    return float(row["value"].iloc[0])


def summary_of(psnr: float, ssim: float, mae: float, fid: float = float("nan")) -> pd.DataFrame:
    rows = []
    for label in ("(0.2,0.4]", "(0.4,0.6]", "All"):
        for metric, value in (("psnr", psnr), ("ssim", ssim), ("mae", mae), ("FID", fid)):
            rows.append({"bin": label, "metric": metric, "value": value, "n": 10})
    return pd.DataFrame(rows)


def one_pair_per_image() -> pd.DataFrame:
    return pd.DataFrame([{"pair_id": "p0", "ratio": 0.3, "psnr": 1.0, "ssim": 1.0, "mae": 1.0}])


def test_paper_vs_ours_gives_the_difference_on_a_matching_dataset_and_marks_protocol_changes(tmp_path):
    record = base_record("sahn_tiny", "SAHN", "paris", "d1", dataset_entry="paris:/data/paris",
                         substitutions={"teacher": "Lite0"}, train={"steps": 150, "batch_size": 8})
    write_cell(tmp_path / "paris" / "sahn_tiny", record, one_pair_per_image(), summary_of(30.0, 0.9, 0.04))
    lines = md_lines(paper_compare.section(find_cells(tmp_path), tmp_path))
    row = next(line for line in lines if line.startswith("| PSNR (dB) ↑ | (0.2,0.4] | SAHN | sahn_tiny"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    paper = paper_value(1, "PSNR", "(0.2,0.4]", "SAHN")
    assert cells[4] == f"{paper:.2f}" and cells[5] == "30.00" and cells[6] == f"{30.0 - paper:+.2f}"
    assert cells[7] == "ST"  # substitute network, training budget
    mae_row = next(line for line in lines if line.startswith("| MAE (×10⁻¹) ↓ | All | SAHN"))
    assert f"{0.4 - paper_value(1, 'MAE_x1e-1', 'All', 'SAHN'):+.3f}" in mae_row  # ours printed ×10 like the paper
    fid_row = next(line for line in lines if line.startswith("| FID ↓ | All | SAHN"))
    assert fid_row.rstrip(" |").endswith("FST") and "| – |" in fid_row  # FID unavailable: not compared
    assert_compile_safe((tmp_path / "report" / "tables" / "paper_vs_ours_paris.tex").read_text())


def test_paper_vs_ours_on_a_stand_in_suite_shows_no_difference(tmp_path):
    record = base_record("ec_tiny", "EC", "faces", "d1")
    write_cell(tmp_path / "faces" / "ec_tiny", record, one_pair_per_image(), summary_of(20.0, 0.7, 0.08))
    text = "\n".join(paper_compare.section(find_cells(tmp_path), tmp_path))
    assert "Table 2 (CelebA)" in text and "not comparable" in text
    row = next(line for line in text.splitlines() if line.startswith("| PSNR (dB) ↑ | All | EC"))
    assert "| n/c |" in row and f"{paper_value(2, 'PSNR', 'All', 'EC'):.2f}" in row and row.rstrip(" |").endswith("D")


def test_paper_notes_on_transcribed_values_are_shown(tmp_path):
    record = base_record("lama", "LaMa-Fourier", "paris", "d1", dataset_entry="paris:/data/paris")
    write_cell(tmp_path / "paris" / "lama", record, one_pair_per_image(), summary_of(30.0, 0.9, 0.04))
    text = "\n".join(paper_compare.section(find_cells(tmp_path), tmp_path))
    assert "internally inconsistent" in text  # the note on LaMa-Fourier's SSIM All in Table 1


def test_table4_renders_the_ablation_beside_the_paper(tmp_path):
    for method, paper_name, psnr in (("sahn_tiny", "SAHN", 20.0), ("sahn_tiny_no_unet", paper_compare.NO_UNET, 18.0),
                                     ("sahn_tiny_no_msf", paper_compare.NO_MSF, 19.0)):
        pairs = pd.DataFrame([{"pair_id": f"p{i}", "ratio": 0.55, "psnr": psnr + 0.1 * i, "ssim": 0.5, "mae": 0.1}
                              for i in range(6)])
        write_cell(tmp_path / "facades" / method, base_record(method, paper_name, "facades", "ablation-digest"), pairs)
    out = tmp_path / "report-root"
    lines = md_lines(paper_compare.table4_section(find_cells(tmp_path), out))
    text = "\n".join(lines)
    header = next(line for line in lines if line.startswith("| Metric | Bin |"))
    assert header.index("sahn_tiny (SAHN)") < header.index("no_unet") < header.index("no_msf")
    assert "Not the paper's data" in text
    assert f"{paper_value(4, 'PSNR', '(0.5,0.6]', paper_compare.NO_UNET):.2f}" in text
    assert "variant − sahn_tiny" in text
    assert "no Inception weights" not in text  # Table 4 has no FID row: neither the F mark nor its detail
    for name in ("table4_facades.tex", "paper_vs_ours_table4_facades.tex", "ablation_intervals_facades.tex"):
        assert_compile_safe((out / "report" / "tables" / name).read_text())


def test_table4_section_reads_the_sibling_ablation_folder(tmp_path):
    main, ablation = tmp_path / "results", tmp_path / "results-ablation"
    main.mkdir()
    pairs = pd.DataFrame([{"pair_id": "p0", "ratio": 0.55, "psnr": 20.0, "ssim": 0.5, "mae": 0.1}])
    write_cell(ablation / "facades" / "a", base_record("a", paper_compare.NO_MSF, "facades", "x"), pairs)
    write_cell(ablation / "facades" / "f", base_record("f", "SAHN", "facades", "x"), pairs)
    lines = md_lines(paper_compare.table4_section([], main))
    assert "`results-ablation`" in lines[0] and str(tmp_path) not in lines[0]  # portable: the name, not the path
    assert any("f (SAHN)" in line for line in lines)
    assert any("pipelines.ablation" in line for line in paper_compare.table4_section([], tmp_path / "elsewhere"))


# ------------------------------------------------------------------------------------------ efficiency
def test_efficiency_section_puts_the_paper_figures_beside_ours_with_ratios(tmp_path):
    rows = [{"method": m, "paper_name": p, "device": "cpu", "device_name": "Test CPU (cpu, 2 threads)",
             "image_size": 256, "batch_size": 1, "params_M": params, "checkpoint_MB": 4 * params,
             "latency_ms": latency, "peak_memory_MB": memory, "memory_kind": "peak RSS rise", "gflops_per_image": 1.0,
             "throughput_batch": 2, "throughput_img_s": 1000 / latency, "scaled": "", "error": "", "load_average": 1.0}
            for m, p, params, latency, memory in (("sahn_paper", "SAHN", 100.0, 2000.0, 500.0),
                                                  ("lama_fourier", "LaMa-Fourier", 34.0, 500.0, 200.0),
                                                  ("ddnm", "DDNM", 114.0, 30000.0, 800.0))]
    rows.append({"method": "broken", "device": "cpu", "device_name": "Test CPU (cpu, 2 threads)", "image_size": 256,
                 "batch_size": 1, "error": "RuntimeError: boom"})
    csv_path = tmp_path / "efficiency" / "efficiency.csv"
    csv_path.parent.mkdir()
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    lines = md_lines(efficiency_table.section(tmp_path))
    ours = [line for line in lines if line.startswith("| sahn_paper") or line.startswith("| lama_fourier")
            or line.startswith("| ddnm") or line.startswith("| broken")]
    assert len(ours) == 4 and all("Test CPU" in line for line in ours)  # the device is named in every row
    assert "failed: RuntimeError: boom" in ours[-1]
    paper = pd.read_csv(Path(efficiency_table.PAPER_EFFICIENCY))
    lama_paper = float(paper.loc[paper["method"] == "LaMa-Fourier", "latency_ms"].iloc[0])
    sahn_paper = float(paper.loc[paper["method"] == "SAHN", "latency_ms"].iloc[0])
    lama_row = next(line for line in lines if line.startswith("| LaMa-Fourier | lama_fourier"))
    assert f"| {lama_paper / sahn_paper:.2f}× | {500 / 2000:.2f}× |" in lama_row
    assert "ddnm ÷ sahn_paper = 15.0×" in "\n".join(lines)  # ours: DDNM 30000 ms vs SAHN 2000 ms
    for name in ("efficiency.tex", "efficiency_paper.tex"):
        assert_compile_safe((tmp_path / "report" / "tables" / name).read_text())


def test_efficiency_section_says_how_to_measure_when_nothing_was(tmp_path):
    assert any("pipelines.efficiency" in line for line in efficiency_table.section(tmp_path))


# ------------------------------------------------------------------------------------------ ablation variants
def test_ablation_variants_switch_off_one_component_and_name_their_paper_column():
    from bench.config import BenchmarkConfig
    from bench.methods import available_methods, create_method
    from pipelines.ablation import ablation_config, ablation_methods

    no_unet = create_method("sahn_tiny_no_unet", lr=1e-3)
    assert no_unet.name == "sahn_tiny_no_unet" and no_unet.paper_name == paper_compare.NO_UNET
    assert no_unet.config.use_unet is False and no_unet.config.use_msf is True and no_unet.config.lr == 1e-3
    no_msf = create_method("sahn_tiny_no_msf")
    assert no_msf.config.use_msf is False and no_msf.paper_name == paper_compare.NO_MSF
    assert "sahn_tiny_no_unet" not in available_methods("tiny")  # never part of the benchmark presets
    assert ablation_methods("paper") == ["sahn_paper", "sahn_paper_no_unet", "sahn_paper_no_msf"]
    assert ablation_config(BenchmarkConfig(scale="tiny")).methods == ["sahn_tiny", "sahn_tiny_no_unet",
                                                                       "sahn_tiny_no_msf"]
