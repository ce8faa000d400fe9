"""Figures from a run directory holding only results.csv and env.json (real runner output in
tests/bench/data): every figure drawn for the quick run, skipped ones say why, missing columns
and failed families degrade to notes."""

import json
import shutil
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from bench import plots
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


def test_every_quick_figure_is_drawn_as_png_and_svg(quick):
    index = plots.load_index(quick)
    assert index is not None
    assert {f.name for f in index.made} == QUICK_FIGURES
    # the quick preset has no paper-protocol case, no training log and no explain.csv
    assert set(index.skipped) == {"paper_pairs", "training_curves", *EXPLAIN_FIGURES}
    assert "paper's protocol" in index.skipped["paper_pairs"]
    for name in QUICK_FIGURES:
        png, svg = quick / "figures" / f"{name}.png", quick / "figures" / f"{name}.svg"
        assert png.stat().st_size > 30_000, name
        pixels = matplotlib.image.imread(png)[..., :3]
        assert pixels.std() > 0.05, f"{name}.png is (nearly) one colour"
        assert pixels.shape[1] >= 1000, f"{name}.png too narrow to read"
        text = svg.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text and len(text) > 20_000


def test_figures_state_device_preset_batch_and_seq_len(quick):
    svg = (quick / "figures" / "memory_vs_seq_len.svg").read_text()
    env = json.loads((quick / "env.json").read_text())
    # svg.fonttype none keeps the text searchable
    for text in (env["device_name"], "preset quick", "batch 2", "seq_len 32, 128",
                 "tracked (live tensor bytes)"):
        assert text in svg, text


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
    figures = plots.plot_run(run_dir, only=["memory_breakdown"])
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
