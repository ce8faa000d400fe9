import pytest

from bench.results import (
    COLUMNS,
    FAILED_STATUSES,
    OK_STATUSES,
    STATUSES,
    append_row,
    finished_case_ids,
    read_results,
)


def test_append_read_roundtrip_keeps_empty_as_missing(tmp_path):
    append_row(tmp_path, {"case_id": "a", "status": "ok", "peak_bytes": 123, "nvml_device_bytes": None})
    append_row(tmp_path, {"case_id": "b", "status": "oom", "error": "out of memory, sorry"})
    df = read_results(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert df["peak_bytes"].tolist()[0] == 123
    assert df["nvml_device_bytes"].isna().all()  # unavailable is empty, never 0
    assert df.loc[1, "error"] == "out of memory, sorry"
    assert finished_case_ids(tmp_path) == {"a", "b"}


def test_torn_last_line_is_skipped_and_next_append_starts_clean(tmp_path):
    append_row(tmp_path, {"case_id": "a", "status": "ok"})
    with (tmp_path / "results.csv").open("a") as fh:
        fh.write("b,toy,toy-deq,de")  # a kill in the middle of a write
    assert finished_case_ids(tmp_path) == {"a"}
    append_row(tmp_path, {"case_id": "c", "status": "ok"})
    assert finished_case_ids(tmp_path) == {"a", "c"}


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(KeyError, match="peak_mem"):
        append_row(tmp_path, {"case_id": "a", "peak_mem": 1})


def test_a_row_torn_inside_a_quoted_field_does_not_swallow_the_rows_after_it(tmp_path):
    append_row(tmp_path, {"case_id": "a", "status": "ok", "solver_trace": {"forward": [1.0, 0.5]}})
    with (tmp_path / "results.csv").open("a") as fh:
        fh.write('b,toy,toy-deq,deq,broyden,implicit,,8,2,debug,core,train,5312,5312,ok,cpu,x,tracked,'
                 '1,1,0,,,,,1,,,,,,,,8,12,0.1,0.1,,,,"{""forward"": [1.0')  # killed inside a quote
    append_row(tmp_path, {"case_id": "c", "status": "oom"})
    append_row(tmp_path, {"case_id": "d", "status": "ok"})
    df = read_results(tmp_path)
    assert df["case_id"].tolist() == ["a", "c", "d"]
    assert df.loc[0, "solver_trace"] == '{"forward": [1.0, 0.5]}'


def test_a_cell_never_breaks_its_line(tmp_path):
    append_row(tmp_path, {"case_id": "a", "status": "error", "error": "first\nsecond\r\nthird"})
    append_row(tmp_path, {"case_id": "b", "status": "ok"})
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    assert read_results(tmp_path)["error"].tolist()[0] == "first second third"


def test_killed_is_a_failed_status():
    assert "killed" in STATUSES and "killed" in FAILED_STATUSES and "killed" not in OK_STATUSES
