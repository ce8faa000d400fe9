import dataclasses

import pytest

from bench.spec import SpecError, list_presets, load_matrix, load_preset, parse_matrix


def matrix(**sweep):
    return {"defaults": {"seq_len": 8, "batch": 2}, "sweep": [sweep]}


def test_deq_cases_not_repeated_per_depth_and_explicit_not_per_solver(toy_models):
    m = parse_matrix(matrix(family="toy", variant=["deq", "tied"], depth=[2, 4, 8],
                            solver=["broyden", "anderson"], phase=["train", "eval"]))
    deq = [c for c in m.cases if c.is_deq]
    tied = [c for c in m.cases if not c.is_deq]
    assert len(deq) == 2 * 2 and all(c.depth is None for c in deq)  # solvers x phases
    assert len(tied) == 3 * 2 and all(c.solver is None and c.backward is None for c in tied)


def test_untied_baseline_without_a_matcher_runs_unmatched_with_a_note(toy_models):
    m = parse_matrix(matrix(model="toy-stack", depth=4))
    assert m.cases[0].overrides == ()
    assert m.notes == ("not parameter-matched: no parameter matcher for the toy family; "
                       "toy-stack runs at its size's config",)
    assert len({c.case_id for c in m.cases}) == len(m.cases)


def test_case_id_and_model_kwargs(toy_models):
    m = parse_matrix(matrix(model=["toy-deq", "toy-tied"], depth=3, backward="phantom"))
    by_model = {c.model: c for c in m.cases}
    assert by_model["toy-deq"].case_id == "toy-deq/debug/core/train/T8/B2/broyden/phantom"
    assert by_model["toy-deq"].model_kwargs() == {"solver": "broyden", "backward": "phantom"}
    assert by_model["toy-tied"].case_id == "toy-tied/debug/core/train/T8/B2/L3"
    assert by_model["toy-tied"].model_kwargs() == {"depth": 3}


def test_config_table_sets_model_fields_on_every_case(toy_models):
    m = parse_matrix({"defaults": {"seq_len": 8, "batch": 2, "config": {"max_iter": 7}},
                      "sweep": [{"model": "toy-deq", "config": {"tol": 0.001}}]})
    (case,) = m.cases
    assert case.overrides == (("max_iter", 7), ("tol", 0.001))
    assert case.case_id.endswith("/max_iter=7/tol=0.001")


def test_missing_family_variant_combination_is_noted(toy_models):
    m = parse_matrix(matrix(family="toy", variant=["deq", "ckpt"], depth=2))
    assert [c.model for c in m.cases] == ["toy-deq"]
    assert m.notes == ("no ckpt variant in the toy family",)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (matrix(model="nope", depth=2), "unknown model 'nope'; valid: .*toy-deq"),
        (matrix(family="toy", solver="newton"), "unknown solver 'newton'; valid: anderson, broyden"),
        (matrix(family="toy", depth=0), r"depth must be positive integers below 2\*\*31, got 0"),
        (matrix(family="toy", depth=2, seq_len=-8), "seq_len must be positive"),
        (matrix(family="toy", depth=2, size="huge"), r"unknown size for toy-deq 'huge'; valid: debug, big"),
        (matrix(family="toy", depth=2, phase="infer"), "unknown phase 'infer'; valid: train, eval"),
        (matrix(family="toy", depth=2, colour="red"), r"unknown key\(s\) \['colour'\]"),
        (matrix(model="toy-tied"), "explicit model toy-tied needs a depth axis"),
        ({"defaults": {"seq_len": 8, "batch": 2}}, "no \\[\\[sweep\\]\\] table"),
        ({**matrix(family="toy", depth=2), "settings": {"repeats": 0}}, "repeats must be a positive integer"),
        ({**matrix(family="toy", depth=2), "settings": {"timeout": 3}}, r"unknown key\(s\) \['timeout'\]"),
        ({**matrix(family="toy", depth=2), "settings": {"predicted": "some"}},
         "predicted must be one of sample, all, none, got 'some'"),
        (matrix(family="toy", model="toy-deq"), "either model or family/variant"),
        (matrix(model="toy-deq", config={"max_iters": 5}), r"config: toy-deq has no config field\(s\) \['max_iters'\]"),
        (matrix(model="toy-deq", config={"max_iter": "many"}), "config: toy-deq.max_iter must be int"),
    ],
)
def test_bad_matrix_says_what_and_lists_valid(toy_models, data, message):
    with pytest.raises(SpecError, match=message):
        parse_matrix(data)


def test_matrix_file_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read matrix file"):
        load_matrix(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep\nmodel = 1")
    with pytest.raises(SpecError, match="does not parse as TOML"):
        load_matrix(bad)
    with pytest.raises(SpecError, match=r"unknown preset 'nope'; valid presets: .*smoke"):
        load_preset("nope")


def test_presets_exist():
    assert {"default", "smoke", "seq-sweep", "depth-sweep", "paper", "gpu-validate"} <= set(list_presets())


def test_predicted_sample_is_each_models_first_case_and_every_case_beyond_debug(toy_models):
    data = matrix(model=["toy-deq", "toy-tied"], depth=[2, 4], seq_len=[8, 16], size=["debug", "big"],
                  phase=["train", "eval"], mode=["core", "lm"])
    cases = parse_matrix(data).cases
    sampled = {c.case_id for c in cases if c.predict}
    debug = {c.case_id for c in cases if c.size == "debug"} & sampled
    assert debug == {"toy-deq/debug/core/train/T8/B2/broyden/implicit",
                     "toy-deq/debug/lm/train/T8/B2/broyden/implicit",
                     "toy-tied/debug/core/train/T8/B2/L2", "toy-tied/debug/lm/train/T8/B2/L2"}
    assert sampled - debug == {c.case_id for c in cases if c.size == "big"}
    for policy, expected in (("all", len(cases)), ("none", 0)):
        m = parse_matrix({**data, "settings": {"predicted": policy}})
        assert sum(c.predict for c in m.cases) == expected
        assert [c.case_id for c in m.cases] == [c.case_id for c in cases]  # ids do not change


def test_a_case_outside_the_sample_runs_every_instrument_but_predicted(toy_models):
    from bench.measure.case import measure_case_result
    from bench.spec import RunSettings

    case = parse_matrix({**matrix(model="toy-tied", depth=2), "settings": {"predicted": "none"}}).cases[0]
    row = measure_case_result(case, "cpu", RunSettings(repeats=1, warmup=0), ())
    assert row["predicted_bytes"] is None and row["tracked_bytes"] and row["flops_per_token"]
    sampled = dataclasses.replace(case, predict=True)
    assert measure_case_result(sampled, "cpu", RunSettings(repeats=1, warmup=0), ())["predicted_bytes"]




def test_a_sweep_names_its_own_instruments(toy_models):
    m = parse_matrix({"defaults": {"seq_len": 8, "batch": 2},
                      "sweep": [{"model": "toy-tied", "depth": 2},
                                {"model": "toy-tied", "depth": 64, "instruments": ["predicted"]}]})
    by_depth = {c.depth: c for c in m.cases}
    assert by_depth[2].instruments == () and by_depth[64].instruments == ("predicted",)
    assert "instruments" not in by_depth[64].case_id  # how a case is measured is not what it is
    with pytest.raises(SpecError, match=r"unknown instrument\(s\) \['sonar'\]"):
        parse_matrix({"defaults": {"seq_len": 8, "batch": 2},
                      "sweep": [{"model": "toy-tied", "depth": 2, "instruments": "sonar"}]})


def test_the_case_instruments_win_over_the_runs(toys):
    from bench.measure.case import measure_case
    from bench.spec import Case, RunSettings

    case = Case(model="toy-tied", family="toy", variant="tied", seq_len=8, batch=2, depth=2,
                instruments=("predicted",))
    row = measure_case(case, "cpu", RunSettings(), ("tracked", "flops"))
    assert row["memory_source"] == "predicted" and row["tracked_bytes"] is None
    assert row["flops_per_token"] is None


def test_a_sweep_may_keep_its_untied_baselines_unmatched():
    m = parse_matrix({"defaults": {"seq_len": 8, "batch": 2, "size": "debug"},
                      "sweep": [{"model": "transformer", "depth": 16},
                                {"model": "transformer", "depth": 8, "match_params": False}]})
    by_depth = {c.depth: c for c in m.cases}
    assert by_depth[16].overrides  # matched: narrower layers
    assert by_depth[8].overrides == ()
    with pytest.raises(SpecError, match="match_params must be true or false"):
        parse_matrix({"defaults": {"seq_len": 8, "batch": 2},
                      "sweep": [{"model": "transformer", "depth": 8, "match_params": "no"}]})
