"""report.md from a directory holding only results.csv and env.json (real runner output in
tests/bench/data): every number in its tables is parsed back and recomputed from the CSV here,
independently of bench.analysis; missing columns and failed families degrade to notes."""

import math
import re
import shutil

import pandas as pd
import pytest

from bench import plots, report
from bench.analysis import RunView
from bench.cli import main
from bench.paper import CLAIM, PAIRS
from bench.results import read_results
from tests.bench.runs import DATA, copy_run

UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables under each heading: heading -> rows as {column: cell}."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, header = None, None
    for line in md.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|") and heading is not None:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                out.setdefault(heading, []).append(dict(zip(header, cells, strict=True)))
        else:
            header = None if not line.startswith("|") else header
    return out


def parse_bytes(cell: str) -> tuple[float, float]:
    """'6.24 MB' -> (6.24e6, the rounding half-step in bytes)."""
    value, unit = cell.split()
    decimals = len(value.partition(".")[2])
    return float(value) * UNITS[unit], 0.5 * 10 ** -decimals * UNITS[unit] + 1e-9


def close(cell: str, expected: float, suffix: str) -> bool:
    assert cell.endswith(suffix), cell
    text = cell.removesuffix(suffix)
    decimals = len(text.partition(".")[2])
    return abs(float(text) - expected) <= 0.5 * 10 ** -decimals + 1e-9


@pytest.fixture
def quick(quick_report):
    """`deqbench report` on a copied results.csv + env.json: the figures and the report."""
    return quick_report, (quick_report / "report.md").read_text(), read_results(quick_report)


def test_report_regenerates_every_figure_and_embeds_it(quick):
    run_dir, md, _ = quick
    index = plots.load_index(run_dir)
    assert index is not None and len(index.made) == 7
    for fig in index.made:
        for f in fig.files:
            assert (run_dir / f).stat().st_size > 20_000
        assert f"![{fig.heading}](figures/{fig.name}.png)" in md
    assert "- Training curves: no training results" in md  # skipped, with the reason


def test_predicted_section_lists_the_rows_with_both(quick, tmp_path):
    _, md, df = quick
    rows = tables(md)["Predicted against tracked"]
    both = df[df["tracked_bytes"].notna() & df["predicted_bytes"].notna()]
    assert len(rows) == len(both) > 0
    for row in rows:
        r = both[both["case_id"] == row["case"].strip("`")].iloc[0]
        assert close(row["difference"], 100 * (r.predicted_bytes / r.tracked_bytes - 1), "%")
    # a run that predicted a sample: only those rows, and the setting said
    run_dir = copy_run("quick", tmp_path / "run")
    sampled = df.assign(predicted_bytes=df["predicted_bytes"].where(df["phase"] == "eval"))
    sampled.to_csv(run_dir / "results.csv", index=False)
    view = RunView.load(run_dir)
    view.env.setdefault("matrix", {}).setdefault("settings", {})["predicted"] = "sample"
    section = report.predicted_section(view)
    assert section[0].startswith(f"{(df['phase'] == 'eval').sum()} of {len(df)} rows have both "
                                 "([settings] predicted = sample)")


def test_pair_tables_match_the_csv(quick):
    _, md, df = quick
    parsed = tables(md)
    checked = 0
    for family in ("transformer", "trellisnet"):
        rows = parsed[family]
        deqs = df[(df["family"] == family) & (df["variant"] == "deq") & (df["status"] == "ok")]
        bases = df[(df["family"] == family) & (df["variant"] != "deq")]
        expected = sum(len(bases[(bases["phase"] == d.phase) & (bases["seq_len"] == d.seq_len)
                                 & (bases["batch"] == d.batch)]) for d in deqs.itertuples())
        assert len(rows) == expected
        for row in rows:
            shape = (df["family"] == family) & (df["phase"] == row["phase"]) \
                & (df["seq_len"] == int(row["T"])) & (df["batch"] == int(row["batch"]))
            deq = df[shape & (df["variant"] == "deq")].iloc[0]
            base = df[shape & (df["model"] == row["baseline"]) & (df["depth"] == int(row["L"]))].iloc[0]
            for cell, true in ((row["DEQ peak"], deq.peak_bytes), (row["baseline peak"], base.peak_bytes)):
                value, tol = parse_bytes(cell)
                assert abs(value - true) <= tol, (cell, true)
            assert close(row["reduction"], 100 * (1 - deq.peak_bytes / base.peak_bytes), "%")
            noisy = any(r.step_s_iqr / r.step_s_median > 0.10 for r in (deq, base))
            slowdown = row["slowdown"].removesuffix(" ~")
            assert row["slowdown"].endswith(" ~") == noisy  # a noisy timing is marked
            assert close(slowdown, deq.step_s_median / base.step_s_median, "×")
            nfe = f"{deq.nfe_forward:.0f}/" + (f"{deq.nfe_backward:.0f}" if row["phase"] == "train" else "—")
            assert row["NFE f/b"] == nfe
            assert int(row["params DEQ"].replace(",", "")) == deq.params_nonembed
            assert int(row["params baseline"].replace(",", "")) == base.params_nonembed
            assert row["source"] == deq.memory_source == "tracked"
            checked += 1
    assert checked == 40  # 24 transformer + 16 trellisnet pairs


def test_verdict_section_counts_match_the_csv(quick):
    _, md, df = quick
    section = md.split("## Verdict")[1].split("\n## ")[0]
    train = df[df["phase"] == "train"]
    deq = train[train["variant"] == "deq"].set_index(["family", "seq_len"])["peak_bytes"]
    base = train[train["variant"] != "deq"]
    reductions = [1 - deq[(b.family, b.seq_len)] / b.peak_bytes for b in base.itertuples()]
    held = sum(r >= CLAIM for r in reductions)
    worse = sum(r < 0 for r in reductions)
    assert f"Over the {len(reductions)} training-step DEQ–baseline pairs" in section
    assert f"saves at least 88% in {held} of them" in section
    assert f"uses more memory than its baseline in {worse}." in section
    paragraph = section.strip().split("\n\n")[0]
    assert paragraph.count(". ") + 1 <= 3  # no generated paragraph longer than three sentences
    # the best pair against the weight-tied transformer, with its shape, in its verdict line
    tied = base[base["model"] == "transformer-tied"]
    best = max(tied.itertuples(), key=lambda b: 1 - deq[(b.family, b.seq_len)] / b.peak_bytes)
    best_pct = 100 * (1 - deq[(best.family, best.seq_len)] / best.peak_bytes)
    line = next(li for li in section.splitlines() if li.startswith("- DEQ-Transformer vs weight-tied"))
    assert f"best {best_pct:.1f}% at T={best.seq_len}, L={best.depth:.0f}" in line


def test_environment_and_failures(quick):
    run_dir, md, df = quick
    env = RunView.load(run_dir).env
    assert "| preset | quick: 48 cases" in md
    assert f"| cases in results.csv | {len(df)}: {len(df)} ok |" in md
    assert "| memory source | tracked (live tensor bytes) |" in md
    assert f"| git | {env['git']['sha'][:12]} |" in md
    assert "Every case finished ok." in md


def test_paper_table_matches_the_csv_and_paper(tmp_path):
    run_dir = copy_run("paper", tmp_path / "paper")
    md = report.write_report(run_dir).read_text()
    df = read_results(run_dir)
    rows = {r["pair"]: r for r in tables(md)["The paper's pairs"]}
    assert len(rows) == len(PAIRS)
    for pair in PAIRS:
        row = rows[pair.label]
        at = (df["size"] == pair.size) & (df["seq_len"] == 150) & (df["batch"] == 15) & (df["phase"] == "train")
        base = df[at & (df["model"] == pair.baseline_model) & (df["depth"] == pair.baseline_depth)].iloc[0]
        deq = df[at & (df["model"] == pair.deq_model)].iloc[0]
        for cell, true in ((row["our baseline peak"], base.peak_bytes), (row["our DEQ peak"], deq.peak_bytes)):
            value, tol = parse_bytes(cell)
            assert abs(value - true) <= tol
        assert close(row["our reduction"], 100 * (1 - deq.peak_bytes / base.peak_bytes), "%")
        assert row["paper baseline"] == f"{pair.baseline_gb:.1f} GB"
        assert row["paper DEQ"] == f"{pair.deq_gb:.1f} GB"
        assert close(row["paper reduction"], 100 * (1 - pair.deq_gb / pair.baseline_gb), "%")
        assert row["source"] == "predicted"
    assert "![The paper's pairs: ours vs the paper](figures/paper_pairs.png)" in md
    held = sum(1 - d / b >= CLAIM for d, b in (
        (df[(df["model"] == p.deq_model) & (df["size"] == p.size)].peak_bytes.iloc[0],
         df[(df["model"] == p.baseline_model) & (df["size"] == p.size) & (df["depth"] == p.baseline_depth)].peak_bytes.iloc[0])
        for p in PAIRS))
    assert f"{held} of {len(PAIRS)} reach 88%" in md


def test_missing_columns_and_an_all_oom_family_degrade_to_notes(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    df = read_results(run_dir)
    trellis = df["family"] == "trellisnet"
    df.loc[trellis, "status"] = "oom"
    df.loc[trellis, "error"] = "MemoryError: out of memory [tracked.py:1]"
    df.loc[trellis, "peak_bytes"] = math.nan
    df = df.drop(columns=["step_s_median", "tokens_per_s", "solver_trace", "nfe_backward"])
    df.to_csv(run_dir / "results.csv", index=False)
    figures = plots.plot_run(run_dir, only=[])  # the tables are under test, not the drawing
    md = report.render(RunView.load(run_dir), figures)
    assert "No DEQ–baseline pair: every DEQ case failed (4 oom)" in md
    assert "results.csv has no step_s_median column; shown as —" in md
    assert "results.csv has no nfe_backward column; shown as —" in md
    rows = tables(md)["transformer"]
    assert len(rows) == 24 and all(r["slowdown"] == "—" for r in rows)
    failed = tables(md)["Cases that did not finish"]
    assert len(failed) == 20
    assert all(r["status"] == "oom" and r["error"] == "MemoryError: out of memory [tracked.py:1]" for r in failed)


def test_no_pairs_at_all_is_a_sentence(tmp_path):
    run_dir = copy_run("quick", tmp_path / "run")
    pd.read_csv(run_dir / "results.csv").query("variant == 'deq'").to_csv(run_dir / "results.csv", index=False)
    md = report.render(RunView.load(run_dir), plots.plot_run(run_dir, only=[]))
    assert "cannot be checked from it" in md
    assert "No DEQ–baseline pair: no explicit baseline in this family." in md


def test_results_csv_alone_is_enough(tmp_path, capsys):
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    shutil.copy(DATA / "paper" / "results.csv", run_dir / "results.csv")
    assert main(["report", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text()
    assert "| env.json | missing: device taken from results.csv |" in md
    assert "preset unknown preset" not in md and "# deq-bench report: unknown preset" in md
    assert (run_dir / "figures" / "paper_pairs.png").exists()
