import pytest

from bench.results import COLUMNS, append_row, finished_case_ids, read_results


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
