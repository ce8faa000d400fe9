"""Figures from a run directory holding only results.csv and env.json (real runner output in
tests/bench/data): every figure drawn for the quick run, skipped ones say why, missing columns
and failed families degrade to notes."""

import json
import shutil
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from bench import plots, report
from bench.cli import main
from bench.plots.explain import EXPLAIN_FIGURES
from bench.plots.style import line_label
from bench.results import read_results
from tests.bench.runs import copy_run

QUICK_FIGURES = {"memory_vs_seq_len", "memory_vs_depth", "reduction", "reduction_map", "speed",
                 "memory_breakdown", "convergence"}


def rewrite(run_dir: Path, change) -> None:
    """Apply `change(df) -> df` to the run's results.csv (written back as CSV text)."""
    df = change(read_results(run_dir))
    df.to_csv(run_dir / "results.csv", index=False)


@pytest.fixture
def quick(quick_report):
    return quick_report


def test_every_quick_figure_is_drawn_as_png(quick):
    index = plots.load_index(quick)
    assert index is not None
    assert {f.name for f in index.made} == QUICK_FIGURES
    # the quick preset has no paper-protocol case, no training log and no explain.csv
    assert set(index.skipped) == {"paper_pairs", "training_curves", *EXPLAIN_FIGURES}
    assert "paper's protocol" in index.skipped["paper_pairs"]
    for name in QUICK_FIGURES:
        png = quick / "figures" / f"{name}.png"
        assert png.stat().st_size > 30_000, name
        pixels = matplotlib.image.imread(png)[..., :3]
        assert pixels.std() > 0.05, f"{name}.png is (nearly) one colour"
        assert pixels.shape[1] >= 1000, f"{name}.png too narrow to read"
        assert not (quick / "figures" / f"{name}.svg").exists()  # SVG only when asked


def test_figures_state_device_preset_batch_and_seq_len(tmp_path):
    """As SVG (`--svg`), whose text stays searchable (svg.fonttype none)."""
    run_dir = copy_run("quick", tmp_path / "run")
    figures = plots.plot_run(run_dir, only=["memory_vs_seq_len"], formats=("svg",))
    assert figures.made[0].files == ["figures/memory_vs_seq_len.svg"]
    svg = (run_dir / "figures" / "memory_vs_seq_len.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 20_000
    env = json.loads((run_dir / "env.json").read_text())
    for text in (env["device_name"], "preset quick", "batch 2", "seq_len 32, 128",
                 "tracked (live tensor bytes)"):
        assert text in svg, text


def test_png_by_default_svg_when_asked_and_the_report_links_what_exists(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    figures = plots.plot_run(run_dir, only=["reduction"], formats=("png", "svg"))
    assert figures.made[0].files == ["figures/reduction.png", "figures/reduction.svg"]
    assert "([SVG](figures/reduction.svg))" in "\n".join(report.figure_section(figures))
    figures = plots.plot_run(run_dir, only=["reduction"])  # the default: PNG only
    assert figures.made[0].files == ["figures/reduction.png"]
    assert not (run_dir / "figures" / "reduction.svg").exists()  # it showed the older drawing
    section = "\n".join(report.figure_section(figures))
    assert "](figures/reduction.png)" in section and "SVG" not in section
    with pytest.raises(ValueError, match="formats"):
        plots.plot_run(run_dir, only=["reduction"], formats=("pdf",))


def test_index_goes_stale_when_results_change(quick, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(quick, run_dir)
    assert plots.load_index(run_dir) is not None
    rewrite(run_dir, lambda df: df.iloc[:-1])
    assert plots.load_index(run_dir) is None  # the report will redraw


def test_missing_columns_are_notes_not_crashes(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    gone = ["tokens_per_s", "step_s_median", "solver_trace", "static_bytes"]
    rewrite(run_dir, lambda df: df.drop(columns=gone))
    figures = plots.plot_run(run_dir, only=["speed", "convergence", "memory_breakdown", "memory_vs_depth"])
    assert [f.name for f in figures.made] == ["memory_vs_depth"]
    assert "tokens_per_s" in figures.skipped["speed"] and "step_s_median" in figures.skipped["speed"]
    assert "solver_trace" in figures.skipped["convergence"]
    assert "static_bytes" in figures.skipped["memory_breakdown"]
    assert any("lacks column(s)" in n and "solver_trace" in n for n in figures.notes)


def test_an_all_oom_family_is_a_note(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")

    def oom(df: pd.DataFrame) -> pd.DataFrame:
        trellis = df["family"] == "trellisnet"
        df.loc[trellis, "status"] = "oom"
        df.loc[trellis, "error"] = "worker killed by SIGKILL (the OS out-of-memory killer, most likely)"
        for col in ("peak_bytes", "static_bytes", "activation_bytes", "tracked_bytes", "tokens_per_s"):
            df.loc[trellis, col] = None
        return df

    rewrite(run_dir, oom)
    figures = plots.plot_run(run_dir, only=["memory_vs_seq_len", "reduction_map", "memory_breakdown"])
    assert {f.name for f in figures.made} == {"memory_vs_seq_len", "reduction_map", "memory_breakdown"}
    assert any("every trellisnet case failed (20 oom)" in n for n in figures.notes)


def test_everything_failed_skips_with_reasons(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    rewrite(run_dir, lambda df: df.assign(status="oom", peak_bytes=None, tokens_per_s=None,
                                          solver_trace=None))
    figures = plots.plot_run(run_dir)
    assert figures.made == []
    assert "all failed" in figures.skipped["memory_vs_seq_len"]
    assert "no DEQ-baseline pair" in figures.skipped["reduction"]


def test_one_sequence_length_skips_what_needs_two(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    rewrite(run_dir, lambda df: df[df["seq_len"] == 128])
    figures = plots.plot_run(run_dir, only=["memory_vs_seq_len", "reduction", "reduction_map"])
    assert [f.name for f in figures.made] == ["reduction"]  # against depth only
    assert "two sequence lengths" in figures.skipped["memory_vs_seq_len"]
    assert ">= 2 sequence lengths" in figures.skipped["reduction_map"]


def test_paper_run_draws_the_paper_comparison(tmp_path):
    run_dir = copy_run("paper", tmp_path / "paper")
    figures = plots.plot_run(run_dir)
    assert {f.name for f in figures.made} == {"paper_pairs", "memory_breakdown"}
    # one shape per model: no line, no map; predicted: no timings, no residuals
    assert "no case was timed" in figures.skipped["speed"]
    assert "predicted runs have none" in figures.skipped["convergence"]
    assert "no line to draw" in figures.skipped["memory_vs_depth"]


def test_training_log_is_drawn(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    sub = run_dir / "deq"  # a `deqbench train --out run/deq` directory beside the results
    sub.mkdir()
    # the layout of bench/train.py's LOG_COLUMNS; a validation row every 20 steps
    rows = []
    for step in range(10, 101, 10):
        loss = 5.0 - step / 40
        rows.append({"step": step, "epoch": 0, "lr": 1e-3, "loss": loss, "ppl": 2.718281828 ** loss,
                     "grad_norm": 1.0, "tokens_per_s": 900 + step, "elapsed_s": step / 10, "pretrain": int(step < 30),
                     "nfe_forward": 2 if step < 30 else 12, "nfe_backward": 2 if step < 30 else 15,
                     "residual_forward": 1e-3, "residual_backward": 1e-5,
                     "peak_bytes": 2_000_000 if step % 50 == 0 else None, "memory_source": "tracked",
                     "valid_loss": loss if step % 20 == 0 else None,
                     "valid_ppl": 2.718281828 ** loss if step % 20 == 0 else None})
    pd.DataFrame(rows).to_csv(sub / "train_log.csv", index=False)
    (sub / "train.json").write_text(json.dumps({"config": {"model": "deq-transformer"}}))
    figures = plots.plot_run(run_dir, only=["training_curves"])
    assert [f.name for f in figures.made] == ["training_curves"]
    assert (run_dir / "figures" / "training_curves.png").stat().st_size > 30_000


def test_plot_command_rejects_a_directory_without_results(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "results.csv does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown figure"):
        plots.plot_run(copy_run("paper", tmp_path / "p"), only=["memroy"])


def test_gpu_rows_add_allocator_reserve_and_cuda_context(tmp_path):
    """The GPU columns (no GPU here: the quick rows relabelled as torch_cuda with a reserve and an
    NVML reading) add their parts to the breakdown and name the source."""
    run_dir = copy_run("quick", tmp_path / "run")
    rewrite(run_dir, lambda df: df.assign(
        memory_source="torch_cuda", reserved_bytes=df["peak_bytes"] + 2_097_152,
        nvml_process_bytes=df["peak_bytes"] + 2_097_152 + 500_000_000))
    figures = plots.plot_run(run_dir, only=["memory_breakdown"], formats=("svg",))
    assert [f.name for f in figures.made] == ["memory_breakdown"]
    svg = (run_dir / "figures" / "memory_breakdown.svg").read_text()
    for text in ("allocator reserve (reserved − peak)", "CUDA context etc. (NVML − reserved)",
                 "torch.cuda max allocated", "MB; peak: "):
        assert text in svg, text


def test_line_labels_name_the_size_from_series_and_tuples():
    # a pandas Series row's .size is its length; the label must read the column
    row = pd.Series({"variant": "tied", "depth": 16.0, "seq_len": 150, "size": "paper-small",
                     "solver": None, "backward": None, "model": "transformer-tied", "family": "transformer"})
    expected = "weight-tied (1 layer x L), L=16 [paper-small]"
    assert line_label(row, "depth", size=True) == expected
    assert line_label(next(pd.DataFrame([row]).itertuples()), "depth", size=True) == expected


# The selection of issue 16 item 1: trellisnet eval and train, deq-transformer eval only, so the
# deq-transformer family has no train panel (and no pair at all).
EMPTY_PANEL = ("trellisnet/debug/core/eval/T32/B2/L4", "trellisnet/debug/core/train/T32/B2/L4",
               "deq-transformer/debug/core/eval/T32/B2/broyden/implicit")


def test_an_empty_family_phase_panel_draws_and_reports(tmp_path, capsys):
    run_dir = copy_run("quick", tmp_path / "run")
    rewrite(run_dir, lambda df: df[df["case_id"].isin(EMPTY_PANEL)])
    assert main(["plot", str(run_dir)]) == 0
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "failed to draw" not in out, out
    index = plots.load_index(run_dir)
    assert "speed" in {f.name for f in index.made}
    assert not [why for why in index.skipped.values() if why.startswith("failed")], index.skipped
    report = (run_dir / "report.md").read_text()
    assert "failed to draw" not in report and "### Speed" in report


def test_a_family_missing_a_phase_gets_a_panel_that_says_so(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    rewrite(run_dir, lambda df: df[~((df["family"] == "trellisnet") & (df["phase"] == "eval"))])
    figures = plots.plot_run(run_dir, only=["memory_vs_seq_len", "speed"], formats=("svg",))
    assert {f.name for f in figures.made} == {"memory_vs_seq_len", "speed"}, figures.skipped
    for name in ("memory_vs_seq_len", "speed"):
        svg = (run_dir / "figures" / f"{name}.svg").read_text()
        assert "trellisnet case" in svg and "in this phase" in svg, name


def test_svg_flag_of_report_and_plot(tmp_path, capsys):
    run_dir = copy_run("paper", tmp_path / "paper")  # two figures: cheap to draw
    assert main(["report", "--svg", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text()
    assert "(figures/paper_pairs.png)" in md and "([SVG](figures/paper_pairs.svg))" in md
    assert main(["plot", str(run_dir)]) == 0
    assert "wrote figures/paper_pairs.png" in capsys.readouterr().out
    assert not (run_dir / "figures" / "paper_pairs.svg").exists()
