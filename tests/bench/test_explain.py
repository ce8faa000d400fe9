"""`deqbench explain`: the chains, their table (every Δ and residual recomputed here from
explain.csv's own columns and from results.csv's rows), each factor reaching the model, the
preset, the CLI's bad input, the report section and the waterfalls."""

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest

from bench import explain, plots
from bench.analysis import RunView
from bench.cli import main
from bench.explain_text import markdown_lines, readme_section, summary_lines
from bench.measure import Workload, measure
from bench.paper import GB, PAIRS
from bench.plots.explain import EXPLAIN_FIGURES
from bench.results import append_row, number, read_results
from bench.spec import load_preset
from models import build_model, make_config

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "results" / "reference" / "cpu" / "paper-audit"
SHAPE_ONLY = {"empty_cache"}  # changes reserved memory on CUDA only: Δ 0 in allocated/predicted bytes


def synthetic_rows(gpu: bool = False) -> list[dict]:
    """A results row for every chain case, each peak a distinct made-up number; on `gpu` with
    the torch_cuda and NVML columns too."""
    rows = []
    for i, case in enumerate(explain.chain_cases()):
        peak = 1_000_000_000 + 37_000_000 * i + 1_000 * (i % 7)
        row = {**case.columns(), "status": "ok", "peak_bytes": peak,
               "memory_source": "torch_cuda" if gpu else "predicted"}
        if gpu:
            row |= {"reserved_bytes": peak + 20_971_520 * (1 + i % 3), "nvml_process_bytes": peak + 90_000_000,
                    "nvml_process_baseline_bytes": 512_000_000}
        rows.append(row)
    return rows


def assert_reproducible(table: pd.DataFrame, results: pd.DataFrame) -> None:
    """Every number of explain.csv from its own columns, and its bytes from results.csv's rows."""
    peaks = dict(zip(results["case_id"], results["peak_bytes"], strict=True))
    rows_by_id = {r["case_id"]: r for r in results.to_dict("records")}
    assert table["source"].notna().all(), "a row without a source"
    for pair in PAIRS:
        rows = table[table["pair"] == pair.key].sort_values("order")
        paper = {"baseline": pair.baseline_gb * GB, "deq": pair.deq_gb * GB}
        previous = None
        for r in rows.to_dict("records"):
            for side in ("baseline", "deq"):
                after = r[f"{side}_bytes"]
                if r["kind"] in ("chain", "like-for-like"):
                    assert after == peaks[r[f"{side}_case"]], (pair.key, r["step"], side)
                if r["kind"] == "paper":
                    assert after == paper[side]
                if r["kind"] in ("chain", "device") and previous is not None:
                    delta = r[f"delta_{side}_bytes"]
                    if r["source"] == "not measured":
                        assert math.isnan(delta) and after == previous[f"{side}_bytes"]
                    else:
                        assert delta == after - previous[f"{side}_bytes"], (pair.key, r["step"], side)
                if r["kind"] == "device" and r["source"] != "not measured":
                    row = rows_by_id[r[f"{side}_case"]]
                    expected = (row["reserved_bytes"] - row["peak_bytes"] if r["step"] == "allocator-cache"
                                else row["nvml_process_bytes"] + row["nvml_process_baseline_bytes"] - row["reserved_bytes"])
                    assert r[f"delta_{side}_bytes"] == expected
                assert r[f"residual_{side}_bytes"] == pytest.approx(paper[side] - after, abs=1e-3)
            reduction = 1 - r["deq_bytes"] / r["baseline_bytes"]
            assert r["reduction"] == pytest.approx(reduction, rel=1e-12)
            assert r["residual_reduction_points"] == pytest.approx(100 * (pair.reduction - reduction), abs=1e-9)
            if r["kind"] in ("chain", "device"):
                previous = r


def table_of(rows: list[dict], tmp_path: Path) -> pd.DataFrame:
    """explain.csv written and read back through a run directory, as the command does."""
    run = tmp_path / "run"
    run.mkdir()
    for row in rows:
        append_row(run, row)
    explain.write_explain(run, explain.explain_table(RunView.load(run).df))
    return RunView.load(run).explain


# -- the chains and the preset -----------------------------------------------------------------
def test_the_preset_holds_exactly_the_cases_of_the_chains():
    matrix = load_preset("paper-audit")
    assert [c.case_id for c in explain.chain_cases()] == list(dict.fromkeys(c.case_id for c in explain.chain_cases()))
    assert {c.case_id for c in matrix.cases} == {c.case_id for c in explain.chain_cases()}
    assert [c.pair.key for c in explain.chains()] == [p.key for p in PAIRS]
    explain.check_matrix(matrix)


def _fields(side: explain.Side) -> dict:
    config = make_config(side.model, side.size, depth=side.depth, **dict(side.config))
    return {**dataclasses.asdict(config), "mode": side.mode}


def test_every_step_changes_only_its_own_factor_and_keeps_a_side_it_does_not_apply_to():
    """A step's case differs from the previous one exactly in its factor's config fields; where
    its factor does not apply, the side keeps its case (and so Δ = 0 by construction)."""
    changed = {name: 0 for name in explain.FACTORS}
    for chain in explain.chains():
        for before, step in zip(chain.steps, chain.steps[1:], strict=False):
            for side in ("baseline", "deq"):
                old, new = getattr(before, side), getattr(step, side)
                diff = {k for k, v in _fields(new).items() if _fields(old)[k] != v}
                if old == new:
                    assert not diff
                    continue
                changed[step.name] += 1
                assert diff, f"{chain.pair.key} {step.name} {side}: a new case with the same config"
                assert diff <= set(explain.FACTORS[step.name][1]), (chain.pair.key, step.name, side, diff)
    assert all(changed[name] for name in explain.FACTORS if name != "modern"), changed


# Each factor at the debug size with the config fields its chain steps set: predicted Δ must not
# be zero, so a field that stops reaching the model (or stops mattering to it) fails here.
PROBES = {
    "dropout": ("transformer", 2, "core", {"dropout": 0.1}, "core", {"dropout": 0.1, "dropout_style": "elementwise"}),
    "aux": ("trellisnet", 4, "core", {"aux_weight": 0.0, "aux_every": 2}, "core", {"aux_weight": 0.1, "aux_every": 2}),
    "weight-dropout": ("trellisnet", 4, "core", {}, "core", {"weight_dropout": 0.5}),
    # few iterations: a fake solve runs every one of them, and Broyden's history grows with the cap
    "caps": ("deq-trellisnet", None, "core", {"max_iter": 3, "b_max_iter": 3}, "core", {"max_iter": 6, "b_max_iter": 6}),
    "chunk": ("deq-trellisnet", None, "core", {"max_iter": 3, "b_max_iter": 3}, "core",
              {"max_iter": 3, "b_max_iter": 3, "subseq_len": 8}),
    "heads": ("trellisnet", 4, "core", {}, "lm", {"head": "split"}),
    "sizes": ("trellisnet", 4, "core", {}, "core", {"nhid": 16}),
}


def _predicted(model: str, depth, mode: str, config: dict) -> int:
    overrides = tuple(sorted(config.items()))
    return measure(Workload(model=model, size="debug", mode=mode, phase="train", batch=2, seq_len=32,
                            depth=depth, overrides=overrides), ["predicted"])["predicted_bytes"]


@pytest.mark.parametrize("factor", sorted(PROBES))
def test_each_factor_moves_predicted_memory_at_the_debug_size(factor):
    model, depth, mode0, before, mode1, after = PROBES[factor]
    changed = {k for k in {*before, *after} if before.get(k) != after.get(k)} | ({"mode"} if mode0 != mode1 else set())
    assert changed and changed <= set(explain.FACTORS[factor][1])
    assert _predicted(model, depth, mode1, after) != _predicted(model, depth, mode0, before)


def test_empty_cache_reaches_the_deq_of_every_chain_that_sets_it():
    """empty_cache moves no allocated byte (only CUDA's reserved ones): its config must reach the
    DEQ. Each side's config is built at the debug size (the keys do not depend on the size)."""
    sides = {step.deq for chain in explain.chains() for step in chain.steps if dict(step.deq.config).get("empty_cache")}
    assert sides
    for deq in sides:
        config = {k: v for k, v in deq.config if k != "subseq_len"}
        assert build_model(deq.model, "debug", mode="core", **config).deq.empty_cache is True


def test_factor_probes_cover_every_factor_the_chains_use():
    assert set(PROBES) == set(explain.FACTORS) - {"modern"}


# -- the table ------------------------------------------------------------------------------------
def test_every_delta_and_residual_is_recomputed_from_explain_csv_and_results(tmp_path):
    rows = synthetic_rows()
    table = table_of(rows, tmp_path)
    assert len(table) == len(PAIRS) * (len(explain.FACTORS) + len(explain.DEVICE) + 3)
    assert_reproducible(table, pd.DataFrame(rows))
    device = table[table["kind"] == "device"]
    assert set(device["source"]) == {"not measured"}  # predicted rows: no GPU column, never invented
    assert device["note"].str.contains("needs a CUDA run").all()


def test_gpu_rows_measure_the_device_overhead_from_their_columns(tmp_path):
    rows = synthetic_rows(gpu=True)
    table = table_of(rows, tmp_path)
    assert_reproducible(table, pd.DataFrame(rows))
    device = table[table["kind"] == "device"]
    assert set(device["source"]) == {"torch_cuda", "nvml"}
    cache = device[device["step"] == "allocator-cache"]
    assert cache["delta_baseline_bytes"].isin([20_971_520 * k for k in (1, 2, 3)]).all()
    final = table[table["step"] == "cuda-context"].set_index("pair")
    heads = table[table["step"] == "heads"].set_index("pair")
    # after the device steps each side is what NVML saw: the context plus the process's peak
    assert (final["baseline_bytes"] - heads["baseline_bytes"] == 90_000_000 + 512_000_000).all()


def test_a_failed_case_leaves_its_cells_empty_and_says_so(tmp_path):
    rows = synthetic_rows()
    failed = explain.chains()[0].steps[3].baseline.case().case_id  # trellis-wt103's aux case
    for row in rows:
        if row["case_id"] == failed:
            row |= {"status": "oom", "peak_bytes": None, "error": "out of memory"}
    table = table_of(rows, tmp_path)
    hit = table[table["baseline_case"] == failed]
    assert hit["baseline_bytes"].isna().all() and hit["note"].str.contains("oom: out of memory").all()
    assert (hit["source"] == "predicted").all()  # the DEQ side's number still has its source


# -- what people read -----------------------------------------------------------------------------
def test_summary_report_section_and_waterfalls(tmp_path):
    rows = synthetic_rows()
    run = tmp_path / "run"
    run.mkdir()
    for row in rows:
        append_row(run, row)
    explain.write_explain(run, explain.explain_table(RunView.load(run).df))
    lines = summary_lines(RunView.load(run).explain)
    assert len(lines) == 1 + len(PAIRS) and all(p.key in "\n".join(lines) for p in PAIRS)
    figures = plots.plot_run(run, only=[EXPLAIN_FIGURES[0]], formats=("svg",))  # its text
    assert [f.name for f in figures.made] == [EXPLAIN_FIGURES[0]]
    svg = (run / "figures" / f"{EXPLAIN_FIGURES[0]}.svg").read_text()
    for text in ("unexplained", "paper", "not", "reduction after each step", "24.7 GB"):
        assert text in svg, text
    section = "\n".join(markdown_lines(RunView.load(run), {EXPLAIN_FIGURES[0]: "figures/x.png"}))
    assert "![waterfall" in section and "Waterfall not drawn" in section  # one drawn, five not
    assert section.count("| modern |") == len(PAIRS)
    assert "word_wt103.py:71-74" in section and "run_wt103_deq_transformer.sh:32" in section


def test_a_run_without_explain_rows_has_no_section_and_lists_no_waterfall(quick_report):
    text = (quick_report / "report.md").read_text()
    assert "factor by factor" not in text and "Waterfall" not in text


# -- the committed run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def committed():
    if not (COMMITTED / "explain.csv").is_file():
        pytest.skip(f"no committed run at {COMMITTED}")
    return RunView.load(COMMITTED)


def test_committed_run_is_reproducible_and_complete(committed, tmp_path):
    results = read_results(COMMITTED)
    assert (results["memory_source"] == "predicted").all() and (results["status"] == "ok").all()
    assert_reproducible(committed.explain, results)
    # explain.csv is what the code makes of results.csv today (rerun `deqbench explain --resume --out`)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    explain.write_explain(fresh, explain.explain_table(committed.df))
    assert (fresh / "explain.csv").read_text() == (COMMITTED / "explain.csv").read_text()


def test_committed_factors_move_memory_exactly_where_their_case_changes(committed):
    """A factor's Δ is non-zero wherever a step changes a side's case, zero where it keeps it
    (empty_cache alone acts on CUDA's reserved memory only: Δ 0 in predicted bytes)."""
    table = committed.explain
    for chain in explain.chains():
        for before, step in zip(chain.steps, chain.steps[1:], strict=False):
            row = table[(table["pair"] == chain.pair.key) & (table["step"] == step.name)].iloc[0]
            for side in ("baseline", "deq"):
                old, new = getattr(before, side), getattr(step, side)
                delta = number(row[f"delta_{side}_bytes"])
                keys = {k for k, v in set(new.config) ^ set(old.config)}
                if old == new or (keys <= SHAPE_ONLY and (old.size, old.mode) == (new.size, new.mode)):
                    assert delta == 0, (chain.pair.key, step.name, side)
                else:
                    assert delta, (chain.pair.key, step.name, side)


def test_readme_section_is_regenerated_from_the_committed_run(committed):
    text = readme_section(committed, "results/reference/cpu/paper-audit")
    assert "Transformer-XL medium need 8.5 GB" in text and text.count("\n| ") == len(PAIRS) + 2
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- generated:explain -->\n", 1)[-1].split("<!-- /generated:explain -->", 1)[0]
    assert block == text, "README's explain block is stale: regenerate it from the committed run"


# -- the command ----------------------------------------------------------------------------------
def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


BAD_MATRICES = {
    "head.toml": ('[[sweep]]\nmodel = "transformer"\ndepth = 2\nseq_len = 8\nbatch = 1\nmode = "lm"\n'
                  'config = { head = "huge" }\n', "unknown head 'huge'; valid heads: none, full, adaptive, split"),
    "core-head.toml": ('[[sweep]]\nmodel = "deq-trellisnet"\nseq_len = 8\nbatch = 1\nconfig = { head = "split" }\n',
                       "head 'split' needs mode 'lm'"),
    "lm-none.toml": ('[[sweep]]\nmodel = "transformer"\ndepth = 2\nseq_len = 8\nbatch = 1\nmode = ["core", "lm"]\n'
                     'config = { head = "none" }\n', "valid heads in lm mode: full, adaptive, split"),
    "style.toml": ('[[sweep]]\nmodel = "transformer"\ndepth = 2\nseq_len = 8\nbatch = 1\n'
                   'config = { dropout_style = "gaussian" }\n', "unknown dropout_style 'gaussian'; valid: variational, elementwise"),
}


@pytest.mark.parametrize(("argv", "message"), [
    (["explain", "--preset", "nope"], "unknown preset 'nope'; valid presets:"),
    (["explain", "--preset", "smoke"], "smoke lacks 36 of the 36 cases the chains need"),
    (["explain", "--out", "a-file/run"], "is not a directory"),
    (["explain", "--out", "done"], "already holds results.csv"),
    (["explain", "--resume", "--out", "nothing-here"], "nothing to resume"),
    *[(["predict", "--matrix", name], message) for name, (_, message) in BAD_MATRICES.items()],
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.csv").write_text("case_id\n")
    for name, (text, _) in BAD_MATRICES.items():
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_the_command_writes_the_chain_of_every_pair(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["explain", "--out", str(out)]) == 0
    view = RunView.load(out)
    assert_reproducible(view.explain, read_results(out))
    assert {f"explain-{p.key}.png" for p in PAIRS} <= {p.name for p in (out / "figures").iterdir()}
    assert "factor by factor" in (out / "report.md").read_text()
    assert all(p.key in capsys.readouterr().out for p in PAIRS)
